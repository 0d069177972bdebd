"""Unit tests of the backend (device model, personality, transport)."""
