"""Generated gRPC contract of ptmig (see protos/ptmig/v1/*.proto)."""
