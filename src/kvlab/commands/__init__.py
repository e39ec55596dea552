"""CLI sub-commands; each module defines ``register(app, bench_app)``."""
