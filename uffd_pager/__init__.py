"""uffd_pager: file-backed, fork-safe memory regions served by userfaultfd."""
