"""The subcommands of ``libragrad-fx``: report, explain, demo; one file each, plus the shared
loop that turns images, targets and methods into maps (``maps.py``)."""
