"""README.md's "Your Keras model on a TFF task" code runs as it is."""

import pathlib
import re

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.

_README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
_SECTION = '### Your Keras model on a TFF task'


def _section_code() -> str:
  text = _README.read_text()
  section = text[text.index(_SECTION):]
  return re.search(r'```python\n(.*?)```', section, re.DOTALL).group(1)


def test_bring_your_own_model_code_runs_as_pasted(capfd):
  # capfd, not redirect_stdout: TFF hands sys.stdout's file descriptor to its
  # worker.
  capfd.readouterr()
  namespace = {'__name__': 'readme_example'}
  exec(compile(_section_code(), str(_README), 'exec'), namespace)  # pylint: disable=exec-used
  lines = [line for line in capfd.readouterr().out.splitlines() if line]
  assert [line.split()[0] for line in lines[:3]] == ['0', '1', '2']
  assert "'accuracy'" in lines[0] and "'server_learning_rate'" in lines[0]
  learned = float(lines[3])
  assert learned > 0 and learned != 0.3  # Learned over two rounds.
  assert "'sparse_categorical_accuracy'" in lines[4] or "'accuracy'" in (
      lines[4])
  state = namespace['state']
  assert namespace['process'].get_hparams(state)['finalizer'][
      'learning_rate'] == 1.0
