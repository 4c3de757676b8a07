"""The device role: one person on this machine (session with the own inbox, sending,
receiving, submission, filing, keys' lifecycle, joining with a code, avatars).

May import: ``onionpost.inbox.postoffice`` and every layer below it.
"""
