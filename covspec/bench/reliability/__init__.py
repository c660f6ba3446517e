"""``covspec bench reliability``: hostile messages, load and faults against a live edge.

``phases`` runs the phases (fuzz, load levels, vanished clients, restarts), ``fuzz_run``
drives the fuzzing sockets and judges the replies, ``fuzz`` draws the cases from the
values of ``hostile``; ``report`` renders the summary and its verdict. ``hostile_edge``
(``--hostile-edge``) turns it around: a fake, hostile edge against the real device.
"""
