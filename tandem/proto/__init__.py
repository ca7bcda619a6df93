"""Generated gRPC stubs (`tandem.proto.v1`) and the command that regenerates them."""
