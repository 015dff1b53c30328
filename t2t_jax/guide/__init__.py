"""The paper guide's experiments (docs/paper_guide.md)."""
