"""Tasks: data, rewards and sweeps of concrete problems (the core library imports none of them)."""
