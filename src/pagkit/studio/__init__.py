"""pagkit studio: a local web page over the library (``pagkit studio``, ``pip install pagkit[studio]``).

``core`` holds everything the page does as plain functions (compare configurations, a scale strip, one column per
site, an eval/tune OUT folder, the equivalent ``pagkit sample`` command line, the ``--models-root`` path checks);
``app`` is the Gradio page, whose callbacks only call ``core``; ``command`` is the subcommand (its arguments and
the launcher with the host/auth rules). Only ``app`` imports Gradio, so the core dependencies stay lean.
"""
