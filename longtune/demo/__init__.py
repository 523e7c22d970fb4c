"""Bundled demo data for ``longtune demo`` (see ``data/SOURCE.md``; built by ``scripts/make_demo_data.py``)."""
