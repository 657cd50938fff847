"""psc.pipelines: chains of named stages from a file on disk to labels on disk."""
