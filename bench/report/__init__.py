"""``bench report``: tables, figures and report.md from the results on disk (nothing is retrained).

- ``results_tables``: tables of the fold metrics (the paper's Tables 1 and 2, operating points, variants);
- ``stats_tables``: tables of bench/analysis.py's CIs and paired tests, localisation, memories, runs;
- ``document``: report.md, section by section; ``prose``: its shared notes and closing section.
"""
