/* moerag chat widget: one <script> tag adds a chat box that streams cited answers.
 *
 *   <script src="https://moerag.intranet/widget.js" data-collection="handbook" data-key="mrg_..."></script>
 *
 * Attributes: data-collection (default "default"), data-key (an API key meant for this page:
 * scoped to the collection, read-only), data-server (default: where this script came from),
 * data-title. No dependencies. Everything from the server is shown as text (textContent), so
 * nothing in a document can inject markup into the host page. The server's MOERAG_API_CORS_ORIGINS
 * must list the host page's origin when it is not the server itself.
 */
(function () {
  "use strict";
  var me = document.currentScript;
  if (!me) return;
  var server = (me.getAttribute("data-server") || new URL(me.src, location.href).origin).replace(/\/$/, "");
  var collection = me.getAttribute("data-collection") || "default";
  var key = me.getAttribute("data-key") || "";
  var title = me.getAttribute("data-title") || "Ask the knowledge base";
  var history = [];

  function el(tag, style, text) {
    var e = document.createElement(tag);
    if (style) e.setAttribute("style", style);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  var box = el("div", "position:fixed;right:20px;bottom:20px;width:380px;max-height:70vh;display:flex;" +
    "flex-direction:column;background:#fff;border:1px solid #ccd;border-radius:10px;" +
    "box-shadow:0 6px 24px rgba(0,0,0,.18);font:14px/1.45 system-ui,sans-serif;color:#222;z-index:2147483000");
  box.className = "moerag-widget";
  var head = el("div", "padding:10px 14px;background:#24335a;color:#fff;border-radius:10px 10px 0 0;font-weight:600", title);
  var log = el("div", "flex:1;overflow-y:auto;padding:10px 14px");
  log.className = "moerag-log";
  var form = el("form", "display:flex;gap:6px;padding:10px;border-top:1px solid #eee");
  var input = el("input", "flex:1;padding:7px 9px;border:1px solid #bbc;border-radius:6px;font:inherit");
  input.type = "text";
  input.placeholder = "Ask a question…";
  input.className = "moerag-input";
  var send = el("button", "padding:7px 12px;border:0;border-radius:6px;background:#24335a;color:#fff;font:inherit;cursor:pointer", "Ask");
  send.type = "submit";
  form.appendChild(input);
  form.appendChild(send);
  box.appendChild(head);
  box.appendChild(log);
  box.appendChild(form);
  document.body.appendChild(box);

  function showSources(container, sources, cited) {
    if (!sources || !sources.length) return;
    var list = el("ol", "margin:8px 0 0;padding-left:22px;font-size:12px;color:#445");
    list.className = "moerag-sources";
    sources.forEach(function (s) {
      var item = el("li", cited.indexOf(s.n) >= 0 ? "font-weight:600" : "opacity:.75");
      item.value = s.n;
      item.appendChild(el("span", "", (s.title || s.source) + (s.page ? " · p. " + s.page : "")));
      item.appendChild(el("div", "font-weight:400;color:#667", s.url || s.source));
      item.appendChild(el("div", "font-weight:400;font-style:italic", s.snippet || ""));
      list.appendChild(item);
    });
    container.appendChild(list);
  }

  function ask(question) {
    log.appendChild(el("div", "margin:8px 0;text-align:right;color:#24335a;font-weight:600", question));
    var reply = el("div", "margin:8px 0;white-space:pre-wrap");
    reply.className = "moerag-answer";
    var thinking = el("details", "margin:4px 0;color:#778;font-size:12px");
    var summary = el("summary", "", "reasoning");
    var thought = el("div", "white-space:pre-wrap");
    thinking.appendChild(summary);
    thinking.appendChild(thought);
    var text = el("span", "");
    reply.appendChild(text);
    log.appendChild(reply);
    log.scrollTop = log.scrollHeight;
    send.disabled = true;
    history.push({ role: "user", content: question });
    var answer = "";
    fetch(server + "/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + key },
      body: JSON.stringify({ model: collection, messages: history, stream: true })
    }).then(function (resp) {
      if (!resp.ok) {
        return resp.json().then(function (body) {
          throw new Error((body && body.error && body.error.message) || ("HTTP " + resp.status));
        });
      }
      var reader = resp.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      function pump() {
        return reader.read().then(function (r) {
          if (r.done) return;
          buffer += decoder.decode(r.value, { stream: true });
          var events = buffer.split("\n\n");
          buffer = events.pop();
          events.forEach(function (ev) {
            var line = ev.trim();
            if (line.indexOf("data:") !== 0) return;
            var data = line.slice(5).trim();
            if (data === "[DONE]") return;
            var chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            var delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
            if (delta.reasoning_content) {
              if (!thinking.parentNode) reply.insertBefore(thinking, text);
              thought.textContent += delta.reasoning_content;
            }
            if (delta.content) {
              answer += delta.content;
              text.textContent = answer;
            }
            if (chunk.citations) showSources(reply, chunk.citations, (chunk.moerag && chunk.moerag.cited) || []);
            log.scrollTop = log.scrollHeight;
          });
          return pump();
        });
      }
      return pump();
    }).then(function () {
      history.push({ role: "assistant", content: answer });
    }).catch(function (err) {
      history.pop();
      reply.appendChild(el("div", "color:#a12", "Error: " + err.message));
    }).then(function () {
      send.disabled = false;
      input.focus();
    });
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var q = input.value.trim();
    if (!q) return;
    input.value = "";
    ask(q);
  });
})();
