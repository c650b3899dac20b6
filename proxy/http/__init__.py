"""HTTP: server and client adapters over the protocol cores, pools, synthetic errors, admin."""
