"""The guest agent: PID 1 inside the VM. Imports only the standard library, protobuf and
the stdlib-only parts of cocoon (errors, log, protocol)."""
