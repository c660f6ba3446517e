"""Device and edge end to end: ``covspec bench run``, ``pruning``, ``drafting`` and ``wire``.

``runner`` runs scenarios (``scenarios``) over emulated links against one edge child;
``report`` and ``lead_report`` turn its records into figures, tables and plots; ``wire``
counts the bytes of real sessions at real vocabulary sizes.
"""
