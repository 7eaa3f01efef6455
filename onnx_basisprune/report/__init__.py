"""What the user reads: plain-text tables for the console, the JSON and Markdown
reports (:mod:`.tables`), and PNG figures (:mod:`.figures`)."""
