"""onionpost: mail whose every inbox is a Tor onion service, end-to-end encrypted per device."""

__version__ = "0.1.0"
