"""Generated protobuf code (built from proto/ by `make proto`; never edited by hand)."""
