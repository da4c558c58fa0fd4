"""Federation-side behaviour of partial-state rooms (MSC3902)."""
