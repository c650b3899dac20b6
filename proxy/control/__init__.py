"""Control-plane clients: a small gRPC-over-h2 client and the protobuf wire format."""
