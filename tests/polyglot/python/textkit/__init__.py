"""A package beside task.py: the build must make it importable."""


def split_words(text):
    return text.split()
