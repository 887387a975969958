"""The group-communication server: the I/O shell around the core (`shell`) and its
Prometheus metrics (`metrics`)."""
