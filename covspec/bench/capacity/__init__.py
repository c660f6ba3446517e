"""The edge's capacity: ``covspec bench load`` (``load``, reported by ``report``).

``replay`` holds the replay devices it runs by the dozen: the real device whose draft
proposes the real draft's chunks, precomputed (``replay_table``) and looked up
(``replay_draft``), at negligible CPU cost.
"""
