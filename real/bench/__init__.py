"""The engine measurements behind the engine commands (``experiments.record``, ``references``,
``profile``, ``measure_policies``, ``engine_bench``): one function per step, so that a command is its
argument checks plus calls, and ``engine_bench live`` runs every step in one process."""
