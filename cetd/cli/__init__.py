"""Command-line entry points: `cetd` (daemon and local admin) and `cetctl` (the client)."""
