"""End-to-end tests: real Synapse processes federating over loopback."""
