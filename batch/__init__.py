"""seedance-batch: spreadsheet rows in, Seedance video task ids out (text-, image- and video-to-video)."""

__version__ = "0.1.0"
