"""README.md's "Your Keras model on a TFF task" code runs as it is."""

import pathlib
import re

import tff_fad  # pylint: disable=unused-import  # Stops leaked TFF workers.

_README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
_SECTION = '### Your Keras model on a TFF task'


def _section_code(title: str = _SECTION) -> str:
  text = _README.read_text()
  section = text[text.index(title):]
  return re.search(r'```python\n(.*?)```', section, re.DOTALL).group(1)


def test_federated_ad_and_newton_cg_examples_run_as_pasted(capfd):
  capfd.readouterr()
  namespace = {'__name__': 'readme_example'}
  for title in ('## Federated AD', '### Second order'):
    exec(compile(_section_code(title), str(_README), 'exec'), namespace)  # pylint: disable=exec-used
  lines = [line for line in capfd.readouterr().out.splitlines() if line]
  # The Newton-CG step lands on the least-squares minimum.
  gradient = namespace['tff_fad'].grad(namespace['loss'])(
      namespace['w'] + namespace['step'], namespace['data'])
  assert max(abs(float(x)) for x in gradient) < 1e-3, gradient
  assert any(line.startswith("mode='forward'") for line in lines), lines
  assert any('3 clients' in line for line in lines), lines


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
