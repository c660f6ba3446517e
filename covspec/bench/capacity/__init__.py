"""The edge's capacity: ``covspec bench load`` (``load``, reported by ``report``).

``replay`` and ``replay_edge_led`` are the replay devices it runs by the dozen: the real
draft's chunks, precomputed, sent at negligible CPU cost.
"""
