"""Tooling to run onionpost without the real world: the private Tor network on loopback,
the two-node loopback harness, and reading what a node filed.  Used by tests/, bench/,
and ``onionpost demo``.

May import: everything.  Production code never imports it (``app.demo`` excepted).
"""
