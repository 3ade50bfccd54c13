"""llmos on a Ray cluster: an instance per node (node.py), placed and watched by a manager
actor (manager.py), driven by `llmos cluster up|down|status` (commands.py). Clients reach
the cluster through libllm.cluster. Needs the `ray` extra; a single machine needs none of it.
"""
