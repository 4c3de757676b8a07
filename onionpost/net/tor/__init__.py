"""The Tor boundary (the only importer of stem and PySocks): run or attach to tor, publish
the inbox onion service, dial peers.  ``runtime.TorRuntime`` is the state machine; the
other modules are its parts.

May import: ``onionpost.base``, ``onionpost.core``.
"""
