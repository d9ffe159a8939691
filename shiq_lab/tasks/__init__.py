"""Tasks built on the core: each sub-package registers its models, data and CLI sub-commands on import.

The core never imports a task by name: :func:`shiq_lab.infra.registry.load_tasks` discovers them.
"""
