"""The inbox role, the post office: accepting sealed mail, enrolment (invites, pairings),
delivering the outbox to peers, and the node API server (the onion service's face;
aiohttp).

May import: ``onionpost.net``, ``onionpost.store``, ``onionpost.base``, ``onionpost.core``.
"""
