"""Small impure foundations every role uses: the clock, asyncio helpers, group commit,
configuration, atomic file writes, the periodic-job scheduler (the only importer of
APScheduler).

May import: ``onionpost.core``.
"""
