"""Composition roots and commands: the CLI (the only importer of click), the node, admin
operations, provisioning, backup, doctor, demo, the process lifecycle.

May import: everything, ``gateway`` included; nothing imports it.
"""
