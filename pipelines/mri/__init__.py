"""The MRI tissue-segmentation pipeline: scan on disk -> model space -> labels on the
scan's own grid."""
