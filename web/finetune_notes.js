// comfyui-finetune: show the notes our nodes return in `ui.text` (for example LoRA keys that
// matched no module in AddLoRA) as a read-only text box on the node. The box is never saved
// into the workflow (serialize = false), so widgets_values keep their positions.
const { app } = window.comfyAPI.app;
const { ComfyWidgets } = window.comfyAPI.widgets;

app.registerExtension({
  name: "comfy_finetune.notes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.category ?? "").startsWith("finetune")) return;
    const previous = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = previous?.apply(this, arguments);
      const lines = message?.text;
      if (Array.isArray(lines) && lines.length) {
        let widget = this.widgets?.find((w) => w.name === "ft_notes");
        if (!widget) {
          widget = ComfyWidgets.STRING(this, "ft_notes", ["STRING", { multiline: true }], app).widget;
          widget.serialize = false;
          if (widget.inputEl) widget.inputEl.readOnly = true;
        }
        widget.value = lines.join("\n");
        this.setDirtyCanvas?.(true, true);
      }
      return result;
    };
  },
});
