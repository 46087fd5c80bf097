"""Command-line entry points (`vpr-edge`, `vpr-export`)."""
