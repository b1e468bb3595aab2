"""Extra CLI commands: each module here defines ``register(app)`` adding its command(s).

Modules are discovered and registered by ``cachefit.cli`` at start-up, so they must import
nothing heavy (no torch) at module level: import inside the command function. What the commands
share (consoles, error handling, the workload and card options) is in :mod:`cachefit.commands.options`;
they import it from there, never from ``cachefit.cli`` (which imports them).
"""
