"""Reaching other nodes: the node API client (the only importer of h11), the Dialer seam,
and Tor (``net.tor``).

May import: ``onionpost.store``, ``onionpost.base``, ``onionpost.core``.
"""
