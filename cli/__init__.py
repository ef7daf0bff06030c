"""The `kdstore` command line (installed as kdstore.cli)."""
