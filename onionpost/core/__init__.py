"""The pure core: protocol, crypto and policy (addresses, wire bodies, retry, DSNs, header
repair, accounts, codes, invite chains, trust, errors).

Why: so it is tested without I/O and every I/O adapter stays thin.  May import: only itself
(and libsodium, in ``crypto.primitives`` alone).  Never sockets, asyncio, sqlite, ``time``, ``os``
or threads: time, randomness and storage are passed in.
"""
