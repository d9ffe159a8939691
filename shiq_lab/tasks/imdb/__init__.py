"""The IMDB task: positive continuations of movie reviews, scored by a linear sentiment classifier.

Importing this package registers the ``imdb-small`` model and the ``shiq-lab evaluate`` sub-command.
"""

from shiq_lab.tasks.imdb import cli as _cli  # noqa: F401  (registers `shiq-lab evaluate`)
from shiq_lab.tasks.imdb import lm as _lm  # noqa: F401  (registers "imdb-small")
