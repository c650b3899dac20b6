"""Where traffic goes: the standalone discovery file (and, later, the Destination API and DNS)."""
