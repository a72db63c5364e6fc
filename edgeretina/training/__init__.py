"""Training: torch + open_clip. Import the submodules you need; nothing heavy is imported here."""
