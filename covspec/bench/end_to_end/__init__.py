"""Device and edge end to end: ``covspec bench run``, ``pruning``, ``drafting``, ``regime`` and ``wire``.

``runner`` runs scenarios (``scenarios``) over emulated links against one edge child;
``report`` and ``lead_report`` turn its records into figures, tables and plots;
``regime`` runs them under emulated deployment regimes and ``plan_check`` compares
``covspec plan`` with those runs; ``wire`` counts the bytes of real sessions at real
vocabulary sizes.
"""
