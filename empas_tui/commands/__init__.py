"""CLI command groups: each module has ``register(subparsers)``; handlers are thin engine clients."""
