// The page under test in react.test.mjs: a React 19 app (bundled by the test
// with esbuild) using the package's React entry against a real edge.
// Driven from the test through `window.reactTest`.

import { createElement as h, StrictMode, useState } from "react";
import { createRoot } from "react-dom/client";
import { SwitchyardClient } from "../dist/index.js";
import { SwitchyardProvider, useSubscription, useSwitchyard } from "../dist/react.js";

const config = window.reactTestConfig;

let setSpecOutside;
const renders = { ticker: 0 };

function Ticker({ spec }) {
  renders.ticker++;
  const { state, online } = useSwitchyard();
  const sub = useSubscription(spec, {
    reducer: (n, e) => n + (e.snapshot ? 0 : 1),
    initialState: 0,
    onEvent: (e) => window.reactTest.events.push({ key: e.key, price: e.data.price, snapshot: e.snapshot === true }),
  });
  return h(
    "div",
    null,
    h("span", { id: "conn" }, state),
    h("span", { id: "online" }, String(online)),
    h("span", { id: "status" }, sub.status),
    h("span", { id: "error" }, sub.error ? sub.error.code : ""),
    h("span", { id: "count" }, String(sub.count)),
    h("span", { id: "live" }, String(sub.state)),
    h(
      "ul",
      { id: "latest" },
      Object.keys(sub.latest)
        .sort()
        .map((k) => h("li", { key: k, "data-key": k, "data-snapshot": String(sub.latest[k].snapshot === true) }, `${k}=${sub.latest[k].data.price}`)),
    ),
  );
}

// With `sharedClient`, the page makes the client (counting its subscribes) and hands it to the provider.
const options = { url: config.url, token: config.token, encoding: "json" };
const shared = config.sharedClient ? new SwitchyardClient(options) : null;
const subscribes = [];
if (shared) {
  const subscribe = shared.subscribe.bind(shared);
  shared.subscribe = (spec) => {
    subscribes.push(spec);
    return subscribe(spec);
  };
}

function App() {
  const [spec, setSpec] = useState(config.spec);
  setSpecOutside = setSpec;
  const child = spec === undefined ? null : h(Ticker, { spec });
  return shared ? h(SwitchyardProvider, { client: shared }, child) : h(SwitchyardProvider, { options }, child);
}

const root = createRoot(document.getElementById("root"));
window.reactTest = {
  events: [],
  renders,
  client: shared,
  subscribes,
  setSpec: (spec) => setSpecOutside(spec),
  unmount: () => root.unmount(),
};
root.render(h(StrictMode, null, h(App)));
