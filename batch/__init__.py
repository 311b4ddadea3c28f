"""seedance-batch: spreadsheet rows in, Seedance text-to-video task ids out."""

__version__ = "0.1.0"
