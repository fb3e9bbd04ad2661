"""Relays from the host's channels (vsock, virtio-serial) into the agent's local
gRPC unix socket.  Sockets, selectors and threads only: no gRPC in here."""
