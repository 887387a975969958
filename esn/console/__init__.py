"""The dispatcher console (`esn console`): a Textual app over the handset model."""
